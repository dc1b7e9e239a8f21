"""`python -m mae_jax.convert`: see `mae_jax.convert.cli`."""
from mae_jax.convert.cli import main

if __name__ == '__main__':
  raise SystemExit(main())
