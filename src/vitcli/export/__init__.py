"""``vitcli export``: options and tolerances, the format table, verification against PyTorch, int8."""
