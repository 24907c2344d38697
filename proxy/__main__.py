from egress_guard.cli import main

main()
