"""agpo_lab: GRPO and AGPO on language models, readable and reproducible."""

import os

__version__ = "0.1.0"

GOMP_SPINCOUNT = "10000"
"""How long torch's OpenMP threads (GNU libgomp) busy-wait at a barrier before they sleep.

libgomp's default is about 300,000 spins. On a machine whose cores are busy with other work (a
browser, a build, a second run), a thread that spins keeps a core from the thread it waits for,
and every small operation waits for the scheduler: the embedded model's steps then take many
times their fair share of the CPU. A shorter spin leaves the results unchanged (it only changes
how threads wait) and costs little on an idle machine; docs/environment.md has the measurements.
libgomp reads the variable once, when torch loads, so it applies where agpo_lab is imported before
torch: the `agpo-lab` commands and the runs they start, and the notebooks, whose imports start
with agpo_lab (`make lab` also passes it to their kernels). Set GOMP_SPINCOUNT yourself to choose
another value."""
os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
