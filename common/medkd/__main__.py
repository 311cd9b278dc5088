from medkd.cli import main

main()
