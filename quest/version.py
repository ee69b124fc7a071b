"""The distribution's version (quest-export), recorded in checkpoints and manifests.

A module of its own, not an attribute of ``quest/__init__``: under an editable install a folder named
``quest`` in the working directory (a checkpoint called ``quest``, say) shadows the package itself as
a namespace package, while its submodules still resolve through the install's finder."""

__version__ = "0.1.0"
