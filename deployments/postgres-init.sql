-- Run once by the postgres image on an empty data volume: Prefect's database beside MLflow's (POSTGRES_DB).
CREATE DATABASE prefect OWNER lifecycle;
