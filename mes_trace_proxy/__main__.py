"""``python -m mes_trace_proxy`` runs the command line."""

from mes_trace_proxy.cli import main

raise SystemExit(main())
