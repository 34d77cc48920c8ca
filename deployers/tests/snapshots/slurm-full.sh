#!/usr/bin/env bash
#SBATCH -J c-0
#SBATCH -o /logs/c-0.log
#SBATCH -e /logs/c-0.log
#SBATCH -p gpu
#SBATCH -A proj42
#SBATCH -n 1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16384M
#SBATCH -t 01:00:00
#SBATCH --exclusive
#SBATCH --constraint="a b"

module load python/3.11
source /opt/venv/bin/activate
exec /opt/venv/bin/python -m dask_rs worker tcp://10.0.0.1:8786 --name c-0 --nthreads 8 --memory-limit 17179869184 --resources GPU=2 --lifetime 3300s --lifetime-stagger 150s
