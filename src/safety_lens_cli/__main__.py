from safety_lens_cli.cli.app import main

main()
