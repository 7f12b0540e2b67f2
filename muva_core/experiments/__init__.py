"""What runs many runs: the notebook runner (``muva run``), ablation sweeps and the evidence study's plan and pool."""
