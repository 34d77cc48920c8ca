#!/usr/bin/env bash
#SBATCH -J c-0
#SBATCH -o /logs/c-0.log
#SBATCH -e /logs/c-0.log
#SBATCH -n 1

exec /opt/venv/bin/python -m dask_rs worker tcp://10.0.0.1:8786 --name c-0 --nthreads 1
