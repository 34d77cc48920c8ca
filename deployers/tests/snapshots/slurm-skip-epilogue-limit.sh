#!/usr/bin/env bash
#SBATCH -J c-0
#SBATCH -o /scratch/logs/c-0.log
#SBATCH -e /scratch/logs/c-0.log
#SBATCH -p long
#SBATCH -n 1
#SBATCH -t 2-00:00:00

/opt/venv/bin/python -m dask_rs worker tcp://10.0.0.1:8786 --name c-0 --nthreads 4 --memory-limit 6GB --lifetime 1h
echo done
