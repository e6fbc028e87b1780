"""Chameleon (MICRO'25) inside SGLang: the overlay package. A map, in reading order:

Pure policy (no SGLang, no torch; tested with plain data):

- :mod:`.config` - ``ChameleonConfig``, everything ``--chameleon`` decides;
- :mod:`.scheduler` - Weighted Request Size, the output-length predictor, K-means queues, M/M/1
  quotas, the multi-level queue with Algorithm 1 admission and bypass (``multi_level_queue``),
  the squash rule (``squash``) and bypass estimates (``bypass``); ``ChameleonPolicy`` is the
  facade;
- :mod:`.cache` - the adapter cache: check-then-act admission, references, tiered eviction by
  score, the ``SlotStore`` it borrows memory through, the KV-slot layout of an adapter;
- :mod:`.catalog` - where adapters come from: names resolved to PEFT adapter directories
  (``--chameleon-adapter-dir``), checked before anything is read;
- :mod:`.dp` - adapter-affinity dispatch across data-parallel replicas with bounded loads, and
  the replicas' report channel;
- :mod:`.clock`, :mod:`.status` - the policy's clock; which components are active and why.

Memory mechanics (torch, no SGLang): :mod:`.memory` - runs of KV token slots as a ``SlotStore``,
the GPU location table and adapter copies, the host-link model.

SGLang integration (the only place that imports ``sglang``): :mod:`.integration` - the plugin's
table of seams (``plugin``), the calls the patches insert (``patch_api``), handlers by concern
(``hooks/``), and the bridges they drive (scheduler, adapter cache, LoRA pool and backend, DP).

Developer tooling, never loaded by a server: :mod:`.dev` - the built-in tiny model and adapters,
and a launcher. The kernels are the separate package ``chameleon_kernels`` (``kernels/``).
"""
