STOPPED="${OUT%.jsonl}.stopped"

# USR2 (Slurm's notice at least {{ signal_lead_s }} s before the time limit, or a preemption notice) and TERM
# go on to the ranks: the router closes the output and leaves $STOPPED saying which signal.
{% if requeue %}
# After USR2 the job requeues itself; TERM (scancel, or the time limit itself) just ends it.
{% endif %}
forward() { echo "kvrelay: SIG$1 in the job script: stopping the ranks"; kill -"$1" "$step" 2>/dev/null; }
trap 'forward USR2' USR2
trap 'forward TERM' TERM

rm -f "$STOPPED"
echo "kvrelay: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: {{ layout }}"
{{ launch }} &
step=$!
wait "$step"
rc=$?
# A trapped signal ends `wait` early: wait on until the ranks have ended.
while kill -0 "$step" 2>/dev/null; do
  wait "$step"
  rc=$?
done
{% if requeue %}
if [ "$rc" -ne 0 ] && [ "$(cat "$STOPPED" 2>/dev/null)" = SIGUSR2 ]; then
  echo "kvrelay: stopped by SIGUSR2; requeueing job ${SLURM_JOB_ID}, its rerun resumes $OUT"
  scontrol requeue "$SLURM_JOB_ID"
fi
{% endif %}
exit "$rc"
