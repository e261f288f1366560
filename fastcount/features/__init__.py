"""The workloads fastcount serves, each a Feature (base.py); fastcount/app.py lists them."""
