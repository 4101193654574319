"""Access to models: walk parameters through PEFT wrappers, load (local / hub), probe, reload, inputs."""
