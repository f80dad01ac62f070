"""Chaos testing: fault injection on real nodes, histories of operations, and the
checkers that judge them (see docs/design.md, "Resilience")."""
