"""What each command does, one module per command family.

:mod:`llama_proc._cli` builds the parsers and names these functions through
:class:`~llama_proc._cli.common.Handler`; a module here is imported only when its command runs,
so each imports what it needs at its top.
"""
