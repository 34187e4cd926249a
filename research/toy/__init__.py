"""Research on the toy LLaVA shipped in qapframe, kept outside the package: the script that trained it
(`research.toy.train`) with its stages, the degeneracy check (`research.toy.check`) and the studies that shaped
the recipe (`research.toy.llm_symbolic`, `research.toy.probes`; results under ``research/toy/results/``).

Run from the repository root, e.g. ``python -m research.toy.train --out DIR``; `docs/toy.md` is the record.
"""
