"""The jobs the ctclip scripts run: one module per script (plus its helpers)."""
