"""``python -m mes_trace_proxy.demo`` (what ``make demo`` runs)."""

from mes_trace_proxy.demo.runner import main

raise SystemExit(main())
