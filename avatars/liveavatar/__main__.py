from avatars.liveavatar.cli import main

raise SystemExit(main())
