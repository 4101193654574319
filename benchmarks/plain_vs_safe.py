"""Plain merge_and_unload() + save + reload versus safe_merge, over the test matrix (tiny models, CPU, float32).

Run: nox -s bench   (or: python benchmarks/plain_vs_safe.py from the project root).
Faithful = max |logits(reloaded) - logits(adapter model)| <= 1e-5.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test builders live in tests/models.py

import pytest  # tests.models skips through pytest where peft cannot build an adapter

import safemerge
from tests.models import ADAPTERS, ARCHS, adapter_model, load_base, logits, sample_ids, save_base


def main() -> None:
    warnings.simplefilter("ignore")
    plain = {"faithful": 0, "wrong": 0}
    safe = {"faithful": 0, "refused": 0, "wrong": 0, "failed": 0}
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, arch in ARCHS.items():
            save_base(arch, root / name)
            for kind in ADAPTERS:
                case = root / f"{name}-{kind}"
                try:
                    model = adapter_model(arch, root / name, kind, case / "adapter")
                except pytest.skip.Exception:
                    continue
                expected = logits(model, sample_ids())
                model.merge_and_unload().save_pretrained(case / "plain")
                diff = float((logits(load_base(arch, case / "plain"), sample_ids()) - expected).abs().max())
                plain["faithful" if diff <= 1e-5 else "wrong"] += 1
                worst = max(worst, diff)
                for policy in ("keep", "untie"):
                    model = adapter_model(arch, root / name, kind, case / f"adapter-{policy}")
                    expected = logits(model, sample_ids())  # a new adapter: LoRA's A is initialised at random
                    try:
                        safemerge.safe_merge(model, case / policy, policy=policy)
                    except safemerge.TiedWeightsError:
                        safe["refused"] += 1
                        continue
                    except safemerge.SafeMergeError:
                        safe["failed"] += 1
                        continue
                    diff = float((logits(load_base(arch, case / policy), sample_ids()) - expected).abs().max())
                    safe["faithful" if diff <= 1e-5 else "wrong"] += 1
    cases = plain["faithful"] + plain["wrong"]
    print(
        f"plain merge_and_unload + save + reload: {plain['faithful']} of {cases} (architecture, adapter) cases "
        f"faithful, {plain['wrong']} silently wrong (worst max |logits difference| {worst:.3g})"
    )
    print(
        f"safe_merge, policies keep and untie ({2 * cases} runs): {safe['faithful']} faithful after reload, "
        f"{safe['refused']} refused before any change, {safe['wrong']} wrong, {safe['failed']} failed verification"
    )


if __name__ == "__main__":
    main()
