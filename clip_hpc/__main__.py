from clip_hpc.cli import main

raise SystemExit(main())
