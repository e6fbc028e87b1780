"""Where adapters come from: names resolved to PEFT LoRA adapter directories (no SGLang, no
torch). :class:`AdapterResolver` is the interface (a name to a local adapter directory, or None
where the resolver does not know it); :class:`DirectoryResolver` is the built-in one, over
``--chameleon-adapter-dir``. Names and files are checked before anything is read."""

from chameleon_sglang.catalog.adapter_config import (
    AdapterRefused,
    AdapterSpec,
    read_adapter_spec,
    refusal_for,
)
from chameleon_sglang.catalog.names import check_adapter_name
from chameleon_sglang.catalog.resolver import (
    AdapterResolver,
    DirectoryResolver,
    Survey,
    resolve,
    survey,
)

__all__ = [
    "AdapterRefused",
    "AdapterResolver",
    "AdapterSpec",
    "DirectoryResolver",
    "Survey",
    "check_adapter_name",
    "read_adapter_spec",
    "refusal_for",
    "resolve",
    "survey",
]
