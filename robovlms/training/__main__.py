"""`python -m robovlms.training CONFIG`: one rank of a cell's training (robovlms/training/launch.py)."""

from robovlms.training.launch import rank_main

if __name__ == "__main__":
    rank_main()
