"""Pure decisions: tie groups, effective weights, the rules (data), the plan, serving rules."""
