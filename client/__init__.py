"""Device side: on-device training, encrypted store, local serving."""
