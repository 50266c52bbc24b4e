import os
import sys

# tiny_trl.py is imported as a plain module by the tests of this folder
sys.path.insert(0, os.path.dirname(__file__))
