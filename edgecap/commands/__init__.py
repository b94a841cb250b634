"""One module per ``edgecap`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``.
Modules import their heavy dependencies inside ``run`` so ``--help`` stays light."""
