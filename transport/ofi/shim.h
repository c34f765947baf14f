/* The libfabric calls colo uses. Most of libfabric's API is `static inline` in its headers
 * (it dispatches through the ops tables of each object), which bindgen cannot bind: shim.c
 * gives each one a real symbol, `colo_fi_<name>`, with the same arguments. */
#ifndef COLO_OFI_SHIM_H
#define COLO_OFI_SHIM_H

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

/* The API version colo is written against (FI_VERSION is a function-like macro). */
uint32_t colo_fi_version(void);
struct fi_info *colo_fi_allocinfo(void);
int colo_fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain);
int colo_fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep);
int colo_fi_passive_ep(struct fid_fabric *fabric, struct fi_info *info, struct fid_pep **pep);
int colo_fi_eq_open(struct fid_fabric *fabric, struct fi_eq_attr *attr, struct fid_eq **eq);
int colo_fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq);
int colo_fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags);
int colo_fi_pep_bind(struct fid_pep *pep, struct fid *bfid, uint64_t flags);
int colo_fi_enable(struct fid_ep *ep);
int colo_fi_listen(struct fid_pep *pep);
int colo_fi_getname(struct fid *fid, void *addr, size_t *addrlen);
int colo_fi_connect(struct fid_ep *ep, const void *addr, const void *param, size_t paramlen);
int colo_fi_accept(struct fid_ep *ep, const void *param, size_t paramlen);
int colo_fi_reject(struct fid_pep *pep, fid_t handle, const void *param, size_t paramlen);
int colo_fi_shutdown(struct fid_ep *ep, uint64_t flags);
ssize_t colo_fi_eq_read(struct fid_eq *eq, uint32_t *event, void *buf, size_t len, uint64_t flags);
ssize_t colo_fi_eq_sread(struct fid_eq *eq, uint32_t *event, void *buf, size_t len, int timeout,
                         uint64_t flags);
ssize_t colo_fi_eq_readerr(struct fid_eq *eq, struct fi_eq_err_entry *buf, uint64_t flags);
int colo_fi_mr_reg(struct fid_domain *domain, const void *buf, size_t len, uint64_t access,
                   uint64_t offset, uint64_t requested_key, uint64_t flags, struct fid_mr **mr,
                   void *context);
uint64_t colo_fi_mr_key(struct fid_mr *mr);
void *colo_fi_mr_desc(struct fid_mr *mr);
int colo_fi_close(struct fid *fid);
int colo_fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av);
int colo_fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr,
		      uint64_t flags);
int colo_fi_mr_bind(struct fid_mr *mr, struct fid *bfid, uint64_t flags);
int colo_fi_mr_enable(struct fid_mr *mr);
ssize_t colo_fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t colo_fi_sendmsg(struct fid_ep *ep, const struct fi_msg *msg, uint64_t flags);
ssize_t colo_fi_senddata(struct fid_ep *ep, const void *buf, size_t len, void *desc, uint64_t data,
                         fi_addr_t dest_addr, void *context);
ssize_t colo_fi_recv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
                     void *context);
ssize_t colo_fi_cq_read(struct fid_cq *cq, void *buf, size_t count);
ssize_t colo_fi_cq_sread(struct fid_cq *cq, void *buf, size_t count, const void *cond, int timeout);
ssize_t colo_fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags);

#endif
