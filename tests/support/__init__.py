"""What the tests share: the process harness, the fault proxy, the exactly-once check."""
