"""What multiprocessing's fork server imports before it forks CPU ranks (worker_process.py), and
the freeze of its heap. Imported by the fork server only, never by an engine's own process.

The modules are what a rank needs before it loads its shard: the rank's own module (torch, the
runner) and transformers' AutoConfig mapping with the validators every config class imports
(~0.8 s). Then `gc.freeze()`, as Python's docs advise for a process that forks without exec: the
garbage collector of every rank forked from here never walks (and so never copies) these
~300,000 objects, and the fork server's own exit skips them too (~0.4 s of teardown).
"""
from __future__ import annotations

import gc

import transformers.models.auto.configuration_auto  # noqa: F401
import transformers.utils.type_validators  # noqa: F401

import kubeinfer.engine.worker_process  # noqa: F401

gc.freeze()
