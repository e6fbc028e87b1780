"""SGLang hook handlers by concern; :mod:`chameleon_sglang.integration.plugin` registers them."""
