"""`python -m avatars.liveavatar.memory_plan`: see `avatars.liveavatar.memory_plan.cli`."""

from avatars.liveavatar.memory_plan.cli import main

raise SystemExit(main())
