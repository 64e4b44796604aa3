"""``python -m dap_pretrain plan|export|cache``."""

from dap_pretrain.cli import main

if __name__ == "__main__":
    main()
