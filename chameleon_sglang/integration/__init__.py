"""Everything that touches SGLang: the only place in the package that imports ``sglang``.

Read :mod:`~chameleon_sglang.integration.plugin` first (the table of SGLang seams and the hook
that serves each), then :mod:`~chameleon_sglang.integration.patch_api` (the calls the patches
insert). Handlers live in ``hooks/`` by concern and hold no logic of their own: they find the
process's :class:`~chameleon_sglang.integration.state.ChameleonState` and call a bridge.
"""
