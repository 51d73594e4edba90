"""Local decisions: rule windows, the rule engine, actuators, coordination, policy intake."""
