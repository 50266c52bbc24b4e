"""Drop-in wiring of the fused RLSD loss into existing RL training loops.

Each integration lives in its own module and imports its library only when that module is imported, so
``import rlsd_kernels`` never requires them: ``rlsd_kernels.integrations.trl`` (TRL's ``GRPOTrainer``, install with
``pip install "rlsd-kernels[trl]"``) and ``rlsd_kernels.integrations.verl`` (a verl plugin: loss function, teacher
batch step and trainer, ``pip install "rlsd-kernels[verl]"``). Each extra has its own test environment.
"""
