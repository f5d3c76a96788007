"""Sandbox backends: isolated, limited environments for untrusted code.

Modules: ``spec`` (what a sandbox looks like), ``bwrap`` (the bubblewrap backend),
``seccomp`` (syscall filter), ``cgroups`` (limits groups), ``errors``.
"""
