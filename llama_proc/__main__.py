"""``python -m llama_proc`` runs the CLI."""

from __future__ import annotations

from llama_proc.cli import main

raise SystemExit(main())
