from ginn_jax._src.cli import main

raise SystemExit(main())
