"""``python -m grpo_kernels``: what was built and what runs here (see grpo_kernels.show_config)."""

from grpo_kernels._diagnostics import show_config

if __name__ == "__main__":  # importing the module (documentation tools do) prints nothing
    show_config()
