# Sourced by the training scripts, from the repository root: the training checkpoints (runs/) live outside the
# work tree, so a run that a session's end stopped resumes in the next session even where the checkout is laid
# anew (the machine, and so $HOME, is often kept; the work tree is not). CHESTXRAY_RUNS picks the folder. A runs/
# that already exists, as a folder or a link, is used as it is.
CHESTXRAY_RUNS=${CHESTXRAY_RUNS:-$HOME/.local/share/chestxray/runs}
if [ ! -e runs ] && [ ! -L runs ]; then
  mkdir -p "$CHESTXRAY_RUNS" && ln -s "$CHESTXRAY_RUNS" runs
fi
