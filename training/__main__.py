from training.driver.cli import main

main()
