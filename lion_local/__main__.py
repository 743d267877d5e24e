from lion_local.cli import main

main()
