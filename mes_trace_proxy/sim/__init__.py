"""Reference MES simulator, CRM traffic generator and an OTLP sink: shared by demo, tests and bench."""
