"""MNIST experiments: configurations (:mod:`.config`), the runner - the project's one training
loop (:mod:`.runner`) -, summaries and plots (:mod:`.report`) and the command lines (:mod:`.cli`)."""
