"""The ``vitcli patches`` job: token arithmetic, attention capture and rollout, class relevance,
faithfulness, and the figures that draw them."""
