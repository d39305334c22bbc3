"""This host: what it is (OS, arch, libc, CPU, GPUs) and which variant it runs."""

from __future__ import annotations
