"""Remote disconnect and reconnect with confirmation: journal, policy, closed loop."""
