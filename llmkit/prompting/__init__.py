"""Prompting: templates, demonstration selection, chain-of-thought, self-consistency, plan-and-solve, cloze
classification, prompt compression and constrained (structured) output. Import the submodules directly."""
