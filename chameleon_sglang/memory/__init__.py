"""Where the adapter cache keeps adapters, in torch: runs of KV-cache token slots
(:mod:`.kv_store`), the GPU location table and copies (:mod:`.device_residency`), the ids of
resident adapters (:mod:`.adapter_ids`) and the host-link model (:mod:`.host_link`). No SGLang
import; SGLang's allocator is used through the attributes ``tests/integration/test_seams.py``
pins."""
