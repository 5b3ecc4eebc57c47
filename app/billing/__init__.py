"""Money: micro-USD amounts, estimates, wallets and their ledger, accounts and keys."""
