"""The jobs the hemorrhage scripts run: one module per script (plus its helpers)."""
